#!/usr/bin/env python3
"""stevedore against llama.cpp on the same checkpoint, side by side, in alternation.

llama.cpp runs through the `llama-cpp-python` package built from source with native CPU flags
(bench/llama-cpp/setup.sh); the checkpoint is converted to GGUF bf16 by the `convert_hf_to_gguf.py`
vendored in that package's source distribution. Each round runs llama.cpp, then `stevedore bench`,
on the same prompt sizes and thread count, and the report prints both, their medians over the
rounds and the ratio:

- decode tokens/s (warm: after a first unmeasured run), greedy, after a 12-token prompt;
- prefill tokens/s for prompts of 12 and 512 tokens;
- time to the first token from a cold start: loading the model with its files dropped from the
  page cache, then a 12-token prompt (stevedore: engine start, warm start running, first token).

It is a benchmark, not a test: CI does not run it. Usage:

    bash bench/llama-cpp/setup.sh                      # once: venv, llama-cpp-python, converter
    cargo build --release -p stevedore-engine -p stevedore-bench
    CK=$HOME/ck-olmoe   # 3.5 GB, plus the GGUF beside it
    target/release/e2e --dir "$CK" --keep --no-engine --hidden 1024 --layers 16 --heads 16 \
        --kv-heads 16 --experts 32 --top-k 4 --intermediate 1024 --vocab 32000
    .venv-llama/bin/python bench/llama-cpp/compare.py --model "$CK" --rounds 3 --json-out cmp.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "fixtures" / "pydoc-moe"


def drop_from_page_cache(paths):
    """Asks the kernel to forget the files' cached pages, so the next load reads the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prompt_ids(n, vocab, seed):
    """Deterministic ids spread over the vocabulary (both engines get the same ones)."""
    out, s = [], seed * 2654435761 + 12345
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((s >> 33) % vocab)
    return out


def convert(model_dir, converter, out):
    """GGUF bf16 of `model_dir` by llama.cpp's own converter. A checkpoint without a tokenizer
    (the random bench checkpoints) borrows pydoc-moe's: the converter needs one to write the
    vocabulary (padded to the model's size); token ids are what both engines are given."""
    if out.exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "model"
        view.mkdir()
        for f in model_dir.iterdir():
            (view / f.name).symlink_to(f.resolve())
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (view / name).exists():
                shutil.copy(TOKENIZER / name, view / name)
        # The borrowed tokenizer's pre-tokenizer is not in the converter's table of known hashes;
        # it only matters for turning text into ids, which this benchmark never does.
        driver = (
            "import sys; sys.argv = sys.argv[1:]; sys.path.insert(0, %r)\n"
            "import conversion.base as b\n"
            "b.TextModel.get_vocab_base_pre = lambda self, tok: 'default'\n"
            "import convert_hf_to_gguf as c; c.main()\n" % str(converter.parent)
        )
        tmp_out = out.with_suffix(".part")
        cmd = [sys.executable, "-c", driver, str(converter), str(view), "--outtype", "bf16", "--outfile", str(tmp_out)]
        subprocess.run(cmd, check=True)
        tmp_out.rename(out)


def llama_round(gguf, threads, vocab, decode, prompts, seed):
    """One round in a fresh process: a mapping left by an earlier round's model would keep its
    pages in the page cache, and the cold start would not be cold."""
    drop_from_page_cache([gguf])
    args = json.dumps([str(gguf), threads, vocab, decode, prompts, seed])
    out = subprocess.run([sys.executable, __file__, "--llama-child", args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def llama_child(gguf, threads, vocab, decode, prompts, seed):
    from llama_cpp import Llama
    import numpy as np

    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    llm.eval(prompt_ids(12, vocab, seed))
    first = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    cold = time.perf_counter() - t0
    del first

    def decode_run(s):
        llm.reset()
        llm.eval(prompt_ids(12, vocab, s))
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(decode - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return (decode - 1) / (time.perf_counter() - t)

    decode_run(seed + 1)  # warm: every weight read once
    out = {"cold_first_token_seconds": cold}
    for p in prompts:
        llm.reset()
        ids = prompt_ids(p, vocab, seed + 100 + p)
        t = time.perf_counter()
        llm.eval(ids)
        out[f"pp{p}"] = p / (time.perf_counter() - t)
    out[f"tg{decode}"] = decode_run(seed + 2)
    llm.close()
    print(json.dumps(out))


def stevedore_round(binary, model, threads, decode, prompts):
    files = [p for p in model.iterdir() if p.suffix == ".safetensors"]
    drop_from_page_cache(files)
    cmd = [str(binary), "bench", "--model", str(model), "--prompt", ",".join(map(str, prompts)),
           "--decode", str(decode), "--repetitions", "1", "--threads", str(threads), "--json"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out = {"cold_first_token_seconds": res["starts"][0]["cold_first_token_seconds"],
           "warm_fill_seconds": res["starts"][0]["warm_fill_seconds"],
           "memory_bandwidth_gb_s": res["memory_bandwidth_gb_s"],
           "decode_weight_bytes_per_token": res["decode_weight_bytes_per_token"]}
    for row in res["rows"]:
        out[row["test"]] = row["tokens_per_s"]
    return out


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-child":
        gguf, threads, vocab, decode, prompts, seed = json.loads(sys.argv[2])
        return llama_child(Path(gguf), threads, vocab, decode, prompts, seed)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--stevedore", type=Path, default=ROOT / "target" / "release" / "stevedore")
    ap.add_argument("--converter", type=Path,
                    default=ROOT / ".venv-llama" / "llama.cpp" / "convert_hf_to_gguf.py")
    ap.add_argument("--gguf", type=Path, help="GGUF file (default: beside the checkpoint, made once)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompts", default="12,512")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    prompts = [int(p) for p in a.prompts.split(",")]
    config = json.loads((a.model / "config.json").read_text())
    vocab = config["vocab_size"]
    gguf = a.gguf or a.model.parent / (a.model.name + "-bf16.gguf")
    convert(a.model, a.converter, gguf)
    import llama_cpp

    rounds = []
    for r in range(a.rounds):
        ll = llama_round(gguf, a.threads, vocab, a.decode, prompts, seed=r)
        st = stevedore_round(a.stevedore, a.model, a.threads, a.decode, prompts)
        rounds.append({"llama_cpp": ll, "stevedore": st})
        print(f"round {r + 1}: llama.cpp {fmt(ll)}\n         stevedore {fmt(st)}", file=sys.stderr)
    tests = [f"pp{p}" for p in prompts] + [f"tg{a.decode}", "cold_first_token_seconds"]
    med = {e: {t: statistics.median(r[e][t] for r in rounds) for t in tests} for e in ("llama_cpp", "stevedore")}
    print(f"llama-cpp-python {llama_cpp.__version__}, {a.threads} threads, {a.rounds} rounds (medians), "
          f"checkpoint {a.model}")
    print("| test | llama.cpp bf16 | stevedore | stevedore / llama.cpp |")
    print("|---|---|---|---|")
    for t in tests:
        l, s = med["llama_cpp"][t], med["stevedore"][t]
        unit = "s" if t.endswith("seconds") else "tok/s"
        # For times lower is better: the ratio is still "how many times faster stevedore is".
        ratio = l / s if t.endswith("seconds") else s / l
        name = "time to first token, cold" if t == "cold_first_token_seconds" else t
        print(f"| {name} | {l:.2f} {unit} | {s:.2f} {unit} | {ratio:.2f}x |")
    if a.json_out:
        a.json_out.write_text(json.dumps({"threads": a.threads, "rounds": rounds, "median": med,
                                          "llama_cpp_python": llama_cpp.__version__}, indent=1))


def fmt(d):
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items() if isinstance(v, float))


if __name__ == "__main__":
    main()
