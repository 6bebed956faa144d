"""TRL end to end: peak RSS growth and time of ``train()``, TRL's GRPOTrainer against ours.

    python benchmarks/trl_end_to_end.py --vocab 151936 --completion-length 512 --out FILE.md

Each trainer runs in a fresh subprocess (``--run NAME``) on the same inputs: a tiny Qwen2
(hidden 64, 2 layers, tied embeddings, float32, seeded weights) on CPU, a word-level
tokenizer with ``--vocab`` entries, ``--steps`` optimisation steps of 8 completions each (one
prompt group of 8, ``min_new_tokens`` = ``max_new_tokens`` = ``--completion-length``).
Peak RSS growth is ``ru_maxrss`` after ``train()`` minus the RSS just before it (Linux). CPU
time is the process's user + system time in ``train()``, meaningful when other work shares
the cores (``--parallel`` runs the subprocesses at once). Runs: ``trl``
(``trl.GRPOTrainer``), ``grpo`` and ``gtpo`` (``GTPOTrainer``, ``advantage_shaping`` grpo /
gtpo, fused linear head) and ``grpo-logits`` (``fused_lm_head=False``, the logits path).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RUNS = ("trl", "grpo", "gtpo", "grpo-logits")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _reward(completions, **kwargs):
    # Both outcomes in every group: GTPO's group filter keeps the batch.
    return [float(i % 2) for i in range(len(completions))]


def run_one(name: str, vocab: int, length: int, steps: int, workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from entropy_kernels.integrations.trl import GTPOConfig, GTPOTrainer

    torch.manual_seed(0)
    tokenizer = _tokenizer(vocab)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=length + 64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    common = dict(
        output_dir=workdir,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length},
        max_steps=steps,
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    if name == "trl":
        trainer_type, args = GRPOTrainer, GRPOConfig(**common)
    else:
        shaping = "gtpo" if name == "gtpo" else "grpo"
        linear = name != "grpo-logits"
        args = GTPOConfig(**common, advantage_shaping=shaping, fused_lm_head=linear)
        trainer_type = GTPOTrainer
    dataset = Dataset.from_dict({"prompt": ["w5 w9 w17 w33"] * (8 * steps)})
    trainer = trainer_type(
        model=model,
        reward_funcs=_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = _rss_kib()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lengths = [
        log["completions/mean_length"]
        for log in trainer.state.log_history
        if "completions/mean_length" in log
    ]
    return {
        "run": name,
        "peak_growth_mib": (peak - before) / 1024,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "mean_completion_length": sum(lengths) / max(len(lengths), 1),
    }


def _result(name: str, process: subprocess.Popen) -> dict:
    stdout, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"run {name} failed with exit status {process.returncode}")
    result = json.loads([x for x in stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--completion-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the subprocesses at once (memory is per process; wall times then compete)",
    )
    parser.add_argument("--out", help="write the markdown table here (default: stdout only)")
    options = parser.parse_args()
    if options.run:
        with tempfile.TemporaryDirectory() as workdir:
            result = run_one(
                options.run, options.vocab, options.completion_length, options.steps, workdir
            )
        print("RESULT " + json.dumps(result))
        return
    results = {}
    running = []
    for name in options.runs:
        command = [sys.executable, __file__, "--run", name, "--vocab", str(options.vocab)]
        command += ["--completion-length", str(options.completion_length)]
        command += ["--steps", str(options.steps)]
        running.append((name, subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
        if not options.parallel:
            results[name] = _result(*running.pop())
    for name, process in running:
        results[name] = _result(name, process)
    lines = [
        f"V = {options.vocab:,}, completion length {options.completion_length}, "
        f"{options.steps} step(s) of 8 completions, tiny Qwen2 (hidden 64), float32, CPU.",
        "",
        "| run | peak RSS growth in train() | ratio to TRL | CPU time of train() | wall time "
        "| mean completion length |",
        "|---|---|---|---|---|---|",
    ]
    base = results.get("trl", {}).get("peak_growth_mib")
    for name, r in results.items():
        ratio = f"{r['peak_growth_mib'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['peak_growth_mib']:,.0f} MiB | {ratio} | {r['cpu_seconds']:.0f} s "
            f"| {r['seconds']:.0f} s "
            f"| {r['mean_completion_length']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if options.out:
        with open(options.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
