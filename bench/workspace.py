"""Build a synthetic but realistic GPU workspace for the data-plane benchmark.

    python bench/workspace.py DIR [--size 2G]

Mix (by bytes): ~75% bf16-like weight shards, ~10% incompressible random blob, ~8% text logs,
~7% a Python source tree of many small files. The weight bytes mimic bf16 tensors drawn from
N(0, 0.02): the low byte of each value (mantissa) is uniformly random, the high byte (sign +
exponent) follows the exponent distribution of such weights, so zstd finds the ~1.2-1.5x that it
finds on real checkpoints rather than the 3x+ of zero-filled or repeated test data.
No numpy needed: bytes.translate and extended-slice assignment do the work at C speed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics

CHUNK = 16 << 20


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _bf16_high_byte_table(std: float = 0.02) -> bytes:
    """Map a uniform random byte to the high byte (sign + 7 exponent bits) of a bf16 sample."""
    dist = statistics.NormalDist(0.0, std)
    table = bytearray(256)
    for i in range(256):
        sign, q = i & 1, (i >> 1) / 128.0 + 1.0 / 256.0
        x = abs(dist.inv_cdf(0.5 + q / 2.0 - 1e-9))  # half-normal quantile
        exponent = max(1, min(254, int(math.floor(math.log2(max(x, 1e-30)))) + 127))
        table[i] = (sign << 7) | (exponent >> 1)
    return bytes(table)


def write_weights(path: str, size: int) -> None:
    table = _bf16_high_byte_table()
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(CHUNK, left) // 2 * 2 or 2
            out = bytearray(n)
            out[0::2] = os.urandom(n // 2)  # low byte: mantissa (+ exponent LSB), ~uniform
            out[1::2] = os.urandom(n // 2).translate(table)
            fh.write(out[:left])
            left -= n


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            fh.write(os.urandom(n))
            left -= n


def write_logs(path: str, size: int, rng: random.Random) -> None:
    levels = ["INFO", "INFO", "INFO", "DEBUG", "WARNING"]
    words = ["step", "loss", "lr", "grad_norm", "tokens/s", "epoch", "eval", "ckpt", "rank", "mem"]
    with open(path, "w") as fh:
        written, step = 0, 0
        while written < size:
            step += 1
            line = "2025-01-%02d %02d:%02d:%02d,%03d %s trainer: %s=%d %s=%.5f %s=%.3e %s=%.2f\n" % (
                1 + step // 86400 % 28,
                step // 3600 % 24,
                step // 60 % 60,
                step % 60,
                rng.randrange(1000),
                rng.choice(levels),
                words[0],
                step,
                words[1],
                rng.uniform(1.5, 3.0),
                words[2],
                rng.uniform(1e-5, 3e-4),
                rng.choice(words[3:]),
                rng.uniform(0, 5e4),
            )
            fh.write(line)
            written += len(line)


def write_code_tree(root: str, size: int, rng: random.Random) -> int:
    idents = [
        "tensor",
        "config",
        "model",
        "layer",
        "weight",
        "bias",
        "hidden",
        "attention",
        "cache",
        "batch",
        "device",
        "dtype",
        "optimizer",
        "scheduler",
        "dataset",
        "tokenizer",
    ]
    written, files = 0, 0
    while written < size:
        pkg = os.path.join(root, "pkg%02d" % (files // 200), "mod%02d" % (files // 20 % 10))
        os.makedirs(pkg, exist_ok=True)
        lines = ['"""Module %d."""' % files, "import os", "import torch", ""]
        for f in range(rng.randrange(3, 40)):
            a, b = rng.choice(idents), rng.choice(idents)
            lines += [
                "def %s_%s_%d(%s, %s=None):" % (a, b, f, a, b),
                '    """Compute %s from %s."""' % (a, b),
                "    if %s is None:" % b,
                "        %s = %s.new_zeros(%d)" % (b, a, rng.randrange(4096)),
                "    return %s * %s + %d" % (a, b, rng.randrange(100)),
                "",
            ]
        text = "\n".join(lines) + "\n"
        with open(os.path.join(pkg, "file_%05d.py" % files), "w") as fh:
            fh.write(text)
        written += len(text)
        files += 1
    return files


def build(root: str, size: int, seed: int = 7) -> dict[str, int]:
    """Create the workspace under `root` (must not exist). Returns the byte split per kind."""
    rng = random.Random(seed)
    os.makedirs(root)
    plan = {"weights": int(size * 0.75), "random": int(size * 0.10), "logs": int(size * 0.08)}
    plan["code"] = size - sum(plan.values())
    models = os.path.join(root, "models", "llama-mini")
    os.makedirs(models)
    shard = 256 << 20
    left, i = plan["weights"], 0
    while left > 0:
        write_weights(os.path.join(models, "model-%05d.safetensors" % i), min(shard, left))
        left -= shard
        i += 1
    os.makedirs(os.path.join(root, "data"))
    write_random(os.path.join(root, "data", "shuffled.bin"), plan["random"])
    os.makedirs(os.path.join(root, "logs"))
    write_logs(os.path.join(root, "logs", "train.log"), plan["logs"], rng)
    plan["code_files"] = write_code_tree(os.path.join(root, "src"), plan["code"], rng)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--size", default="2G")
    args = ap.parse_args()
    print(build(args.root, parse_size(args.size)))


if __name__ == "__main__":
    main()
