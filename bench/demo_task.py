"""Demo task: route a customer message to one of four teams, answering with the team name only.

The project writes the data itself (templates x slot fillers, seeded). Eval examples use phrasings
(templates) that never occur in the training data, so the accuracy measures more than memory.

  python bench/demo_task.py data --out demo                       # demo/train.jsonl, demo/eval.jsonl
  scaleserve train --data demo/train.jsonl --eval-data demo/eval.jsonl --kind peqa --out demo/route.safetensors
  python bench/demo_task.py eval --data demo/eval.jsonl --adapter demo/route.safetensors --json demo/acc.json
  python bench/demo_task.py sweep --out demo                      # both kinds x both granularities, one table

Accuracy, per eval example, from a greedy chat reply (max 8 new tokens):
  exact  the reply, stripped, lower-cased and without a final '.', is exactly the label
  label  the first team name the reply mentions is the right one (format ignored)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

LABELS = ("billing", "shipping", "technical", "account")
INSTRUCTION = ("Route this customer message to one team: billing, shipping, technical or account. "
               "Reply with the team name only.\n\nMessage: ")

# Per label: the first TRAIN_TEMPLATES go to training, the rest only to eval.
TRAIN_TEMPLATES = 10
TEMPLATES = {
    "billing": [
        "I was charged twice for my {plan} subscription this month.",
        "Why is there a {amount} charge on my credit card?",
        "Can I get a refund for the {plan} plan I cancelled {when}?",
        "My invoice for {month} shows the wrong amount.",
        "Please update the card you bill for my {plan} plan.",
        "The discount code {code} was not applied to my bill.",
        "I need a copy of my receipt for the payment from {when}.",
        "You billed me {amount} after I downgraded to the free plan.",
        "How do I switch from monthly to yearly billing?",
        "My payment of {amount} failed but the money left my bank account.",
        "Is VAT included in the {amount} you charged me?",
        "I want my money back for the {product} I returned {when}.",
        "Why did the price of my {plan} subscription go up to {amount}?",
    ],
    "shipping": [
        "My {product} has not arrived yet, it was due {when}.",
        "The tracking number for my {product} order does not work.",
        "The box with my {product} arrived damaged.",
        "Can you ship my {product} to {city} instead?",
        "How long does delivery to {city} usually take?",
        "The courier left my {product} at the wrong address.",
        "I received someone else's parcel instead of my {product}.",
        "My order of a {product} is stuck in customs in {city}.",
        "Do you offer express delivery for the {product}?",
        "The {product} was marked as delivered {when} but nothing came.",
        "Only half of my order arrived, the {product} is missing.",
        "Can I pick up my {product} at a store in {city} instead of delivery?",
        "When will my {product} leave your warehouse?",
    ],
    "technical": [
        "The app crashes every time I open the {feature} page.",
        "I get error {errcode} when I try to {action}.",
        "My {product} will not connect to wifi after the update.",
        "The {feature} screen stays blank on my {device}.",
        "Sync between my {device} and the web app stopped working {when}.",
        "The {product} keeps restarting by itself.",
        "Uploading a file larger than {size} fails with a timeout.",
        "Notifications stopped working on my {device}.",
        "The {feature} button does nothing when I click it.",
        "Since the latest update the app is very slow on my {device}.",
        "The firmware update of my {product} failed halfway.",
        "Exporting the {feature} page to PDF gives a corrupted file.",
        "The API returns error {errcode} for every request since {when}.",
    ],
    "account": [
        "I forgot my password and the reset email never comes.",
        "How do I change the email address on my account?",
        "Please delete my account and all my data.",
        "I cannot log in, it says my account is locked.",
        "Someone else logged into my account from {city}.",
        "How do I add a second user to my {plan} account?",
        "I want to change my username to {name}.",
        "Two-factor authentication codes are not accepted when I log in.",
        "Can I merge my two accounts into one?",
        "How do I transfer ownership of my account to {name}?",
        "My account was suspended {when} and I do not know why.",
        "I want to update the phone number on my profile.",
        "Please unlock the account of my colleague {name}.",
    ],
}
FILLERS = {
    "plan": ["Basic", "Pro", "Team", "Family", "Premium"],
    "amount": ["$9.99", "$19", "$49.50", "120 euros", "$240", "15 pounds"],
    "when": ["last week", "yesterday", "two days ago", "on Monday", "last month", "three weeks ago"],
    "month": ["January", "March", "June", "September", "November"],
    "code": ["SAVE10", "WELCOME", "SPRING25"],
    "product": ["headphones", "laptop stand", "coffee grinder", "smart speaker", "phone case", "desk lamp",
                "router", "keyboard"],
    "city": ["Berlin", "Lyon", "Toronto", "Osaka", "Madrid", "Chicago"],
    "feature": ["settings", "dashboard", "reports", "calendar", "search", "profile"],
    "device": ["iPhone", "Android phone", "Windows laptop", "iPad", "Mac"],
    "errcode": ["500", "403", "E-17", "0x80070005"],
    "action": ["save a draft", "upload a photo", "open a report", "sign a document"],
    "size": ["10 MB", "2 GB", "500 MB"],
    "name": ["maria.k", "jdoe", "alex_w", "sam-ops"],
}


def _fill(template: str, rng: random.Random) -> str:
    keys = [k for k in FILLERS if "{" + k + "}" in template]
    return template.format(**{k: rng.choice(FILLERS[k]) for k in keys})


def _examples(templates: list[str], per_label: int, rng: random.Random) -> list[str]:
    """Up to per_label distinct messages from these templates, spread evenly over them."""
    seen, out = set(), []
    for _ in range(per_label * 20):
        if len(out) == per_label:
            break
        text = _fill(templates[len(out) % len(templates)], rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    while len(out) < per_label:  # templates without slots have one text each
        out.append(_fill(rng.choice(templates), rng))
    return out


def record(message: str, label: str | None = None) -> dict:
    msgs = [{"role": "user", "content": INSTRUCTION + message}]
    if label is not None:
        msgs.append({"role": "assistant", "content": label})
    return {"messages": msgs}


def make_data(out: Path, train_per_label: int = 100, eval_per_label: int = 20, seed: int = 0) -> dict:
    rng = random.Random(seed)
    train, evals = [], []
    for label in LABELS:
        t = TEMPLATES[label]
        train += [record(m, label) for m in _examples(t[:TRAIN_TEMPLATES], train_per_label, rng)]
        evals += [record(m, label) for m in _examples(t[TRAIN_TEMPLATES:], eval_per_label, rng)]
    rng.shuffle(train)
    rng.shuffle(evals)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": len(train), "eval": len(evals), "dir": str(out)}


# --- task accuracy ----------------------------------------------------------------------------


def normalize(reply: str) -> str:
    return reply.strip().lower().rstrip(".").strip()


def first_label(reply: str) -> str | None:
    text = reply.lower()
    hits = [(text.find(label), label) for label in LABELS if label in text]
    return min(hits)[1] if hits else None


def read_eval(path: Path) -> list[tuple[list[dict], str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            msgs = json.loads(line)["messages"]
            out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def task_accuracy(lm, data: Path, adapter=None, limit: int | None = None, batch: int = 32) -> dict:
    """Greedy replies to every eval prompt -> {exact, label, n, samples}."""
    from scaleserve.server.generate import generate_ids

    items = read_eval(data)[:limit]
    tok = lm.tokenizer
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for m, _ in items]
    replies = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        ids, _ = generate_ids(lm, chunk, [adapter] * len(chunk), max_new_tokens=8, temperature=0.0)
        replies += [tok.decode(t, skip_special_tokens=True) for t in ids]
    exact = sum(normalize(r) == y for r, (_, y) in zip(replies, items))
    label = sum(first_label(r) == y for r, (_, y) in zip(replies, items))
    n = len(items)
    samples = [{"label": y, "reply": r} for r, (_, y) in list(zip(replies, items))[:6]]
    return {"exact": exact / n, "label": label / n, "n": n, "samples": samples}


def _load(model_dir: str | None):
    from scaleserve.server.loader import ensure_default_model, load_model
    from scaleserve.server.settings import Settings

    path = Path(model_dir) if model_dir else ensure_default_model(Settings().data_dir)
    return load_model(path)


def _print_table(rows: list[dict]) -> None:
    cols = ["adapter", "kind", "granularity", "params", "steps", "train_s", "eval_loss", "eval_ppl", "exact",
            "label"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>11.4f}" if isinstance(v, float) else f"{str(v):>11}")
        print(" | ".join(cells))


def cmd_data(args) -> int:
    print(json.dumps(make_data(Path(args.out), args.train_per_label, args.eval_per_label, args.seed)))
    return 0


def cmd_eval(args) -> int:
    from scaleserve.adapters.format import load_adapter

    lm = _load(args.model_dir)
    data = Path(args.data)
    rows = []
    for path in [None] + list(args.adapter or []):
        adapter = load_adapter(path) if path else None
        acc = task_accuracy(lm, data, adapter, args.limit)
        row = {"adapter": Path(path).stem if path else "base", "exact": acc["exact"], "label": acc["label"],
               "n": acc["n"], "samples": acc["samples"]}
        if adapter is not None:
            m = adapter.metadata
            row.update(kind=adapter.kind, granularity=m.get("granularity", adapter.granularity),
                       params=int(m.get("trainable_parameters", 0)), steps=int(m.get("train_steps", 0)),
                       train_s=float(m.get("train_seconds", 0)))
            if "eval_loss_after" in m:
                row.update(eval_loss=float(m["eval_loss_after"]), eval_ppl=float(m["eval_ppl_after"]),
                           eval_loss_before=float(m["eval_loss_before"]))
        rows.append(row)
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(lm.path), "data": str(data), "rows": rows}, indent=2))
    return 0


def cmd_sweep(args) -> int:
    """Data, then an adapter per kind x granularity, each evaluated; one table + JSON."""
    import torch

    from scaleserve.adapters.train import TrainConfig, train

    torch.set_num_threads(args.threads) if args.threads else None
    out = Path(args.out)
    make_data(out)
    lm = _load(args.model_dir)
    base = task_accuracy(lm, out / "eval.jsonl", None, args.limit)
    rows = [{"adapter": "base", "exact": base["exact"], "label": base["label"], "samples": base["samples"]}]
    _print_table(rows)
    for kind, gran in itertools.product(args.kinds, args.granularities):
        cfg = TrainConfig(kind=kind, granularity=gran, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          warmup_steps=args.warmup_steps, schedule="cosine", seed=0, name=f"route-{kind}-{gran}")
        t0 = time.time()
        res = train(lm, out / "train.jsonl", cfg, eval_data=out / "eval.jsonl", progress=not args.quiet)
        res.adapter.save(out / f"route-{kind}-{gran}.safetensors")
        acc = task_accuracy(lm, out / "eval.jsonl", res.adapter, args.limit)
        rows.append({"adapter": cfg.name, "kind": kind, "granularity": gran,
                     "params": int(res.adapter.metadata["trainable_parameters"]), "steps": res.steps,
                     "train_s": round(res.seconds, 1), "tokens_per_s": round(res.tokens_per_s, 1),
                     "eval_loss_before": res.eval_before["loss"], "eval_loss": res.eval_after["loss"],
                     "eval_ppl_before": res.eval_before["ppl"], "eval_ppl": res.eval_after["ppl"],
                     "exact": acc["exact"], "label": acc["label"], "adapter_bytes": res.adapter.nbytes,
                     "wall_s": round(time.time() - t0, 1), "samples": acc["samples"]})
        _print_table(rows)
        Path(args.json or out / "sweep.json").write_text(json.dumps(
            {"model": str(lm.path), "device": str(lm.device), "lr": args.lr, "epochs": args.epochs,
             "batch_size": args.batch_size, "rows": rows}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write train.jsonl and eval.jsonl")
    d.add_argument("--out", default="demo")
    d.add_argument("--train-per-label", type=int, default=100)
    d.add_argument("--eval-per-label", type=int, default=20)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)
    e = sub.add_parser("eval", help="task accuracy of the base and of each --adapter")
    e.add_argument("model_dir", nargs="?", help="scaleserve model directory (default: embedded SmolLM2)")
    e.add_argument("--data", required=True)
    e.add_argument("--adapter", action="append", help="adapter file (repeatable)")
    e.add_argument("--limit", type=int, help="only the first N eval examples")
    e.add_argument("--json", help="write the table as JSON here")
    e.set_defaults(func=cmd_eval)
    s = sub.add_parser("sweep", help="train and evaluate peqa/alphatuning x channel/group")
    s.add_argument("model_dir", nargs="?")
    s.add_argument("--out", default="demo")
    s.add_argument("--kinds", nargs="+", default=["peqa", "alphatuning"])
    s.add_argument("--granularities", nargs="+", default=["channel", "group"])
    s.add_argument("--epochs", type=float, default=1.0)
    s.add_argument("--lr", type=float, default=1e-2)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--warmup-steps", type=int, default=5)
    s.add_argument("--limit", type=int)
    s.add_argument("--threads", type=int)
    s.add_argument("--json")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sweep)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
