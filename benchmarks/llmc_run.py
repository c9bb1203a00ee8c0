"""Run llm-compressor (the peer) on a Hugging Face directory: RTN or GPTQ, W{bits}A16, symmetric,
group 128, on given calibration token ids; saves a compressed-tensors checkpoint.

Runs in its own virtual environment (llm-compressor pins transformers and compressed-tensors
versions quantkit does not use), made by benchmarks/gpu_gptq.py:

    python3.11 -m venv ~/.cache/quantkit/venv-llmc
    ~/.cache/quantkit/venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

    venv-llmc/bin/python benchmarks/llmc_run.py --model HF_DIR --ids calib.pt --method gptq --bits 4 -o OUT
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="torch.save'd LongTensor [n, seqlen] of calibration ids")
    ap.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=True, strategy="group", group_size=args.group_size))
    groups = {"group_0": scheme}
    if args.method == "gptq":
        ids = torch.load(args.ids)
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=ids.shape[0])
    else:
        recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
        oneshot(model=model, recipe=recipe)
    model.save_pretrained(args.output, save_compressed=True)
    print(f"LLMC_DONE {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
