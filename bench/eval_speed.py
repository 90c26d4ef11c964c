"""C-Eval speed: `cla2 eval`'s scorer vs the seed's method, same model, same questions, same predictions.

The seed's method: one `model.generate(max_new_tokens=1)` call per question, unbatched, reading the
first step's logits, with the few-shot prefix recomputed for every question. Ours: the subject's prefix
once (its KV cache shared), questions in batches. Both sum the logits of the two token forms of each
letter. Printed: questions/s of each and the ratio, 5-shot (target >= 4x) and zero-shot (target >= 1.5x).

    .venv-runtime/bin/python bench/eval_speed.py            # full size (CPU: a few minutes)
    .venv-runtime/bin/python bench/eval_speed.py --smoke    # seconds, for `make test`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime" / "src"))
SHARED = REPO.parent / "shared"


def seed_predict(model, tokenizer, letters, text: str) -> str:
    import torch

    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
    logits = out.logits[0][0].float()
    scores = [float(logits[a] + logits[b]) for a, b in letters]
    return "ABCD"[max(range(4), key=lambda i: scores[i])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, two subjects: seconds")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "ceval-exam")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "fixtures" / "chinese-llama-2-tokenizer")
    ap.add_argument("--subjects", default="computer_network,law,high_school_history,accountant")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shots", default="5,0", help="comma list of shot counts to measure")
    args = ap.parse_args()
    if args.smoke:
        args.hidden_size, args.layers, args.subjects = 64, 2, "computer_network,law"

    from cla2 import eval as ev
    from cla2 import tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench = ev.BENCHMARKS["ceval"]
    known = ev.subjects_of("ceval")
    subjects = args.subjects.split(",")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.main(Path(tmp) / "model", tokenizer=args.tokenizer, hidden_size=args.hidden_size,
                              layers=args.layers, heads=max(1, args.hidden_size // 64),
                              intermediate_size=args.hidden_size * 8 // 3, max_position_embeddings=4096, shards=1)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        letters = ev.letter_token_ids(tok)
        scorer = ev.Scorer(model, tok, model.device, batch_size=args.batch_size)
        print(f"model: hidden {args.hidden_size}, {args.layers} layers, vocab {len(tok)}; subjects {args.subjects}")
        for shots in [int(s) for s in args.shots.split(",")]:
            work = []
            for s in subjects:
                rows = ev.read_csv(bench.path(args.data, s, "val"), bench, True)
                dev = ev.read_csv(bench.path(args.data, s, "dev"), bench, True)
                if args.smoke:
                    rows = rows[:6]
                work.append((ev.few_shot_prefix(known[s][1], dev, shots), [ev.question_prompt(q, False) for q in rows]))
            n = sum(len(p) for _, p in work)
            seed_predict(model, tok, letters, work[0][0] + work[0][1][0])  # warm up
            t0 = time.perf_counter()
            seed = [seed_predict(model, tok, letters, prefix + p) for prefix, prompts in work for p in prompts]
            seed_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = [letter for prefix, prompts in work for letter, _ in scorer.predict(prefix, prompts)]
            ours_s = time.perf_counter() - t0
            same = sum(a == b for a, b in zip(seed, ours, strict=True))
            print(f"{shots}-shot: {n} questions; seed {n / seed_s:7.1f} q/s ({seed_s:.1f}s), "
                  f"cla2 {n / ours_s:7.1f} q/s ({ours_s:.1f}s); ratio {seed_s / ours_s:.2f}x "
                  f"(target >= {4 if shots else 1.5}); identical predictions {same}/{n}")
            if same != n:
                failed = True
                print(f"FAIL: {n - same} predictions differ from the seed's method", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
