"""Device check (not collected by pytest): every intervention gives the same numbers on DEVICE as on the CPU.

    python3 tests/interventions/device_check.py cuda

Loads models without `neuronmap.models.loading` (which needs pydantic, absent on the device image), runs
each method on the CPU and on DEVICE, prints the largest differences and exits 1 when one is too large.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from handbuilt_induction import build_induction_model  # noqa: E402

from neuronmap.interventions import (Ablation, AttributionPatching, CausalTracing, Counterfactual,  # noqa: E402
                                     HeadStatistics, Steering)
from neuronmap.models.adapter import ModelAdapter  # noqa: E402
from neuronmap.models.tiny import make_tiny  # noqa: E402


def load(path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return SimpleNamespace(model=model, tokenizer=tokenizer, name=str(path), adapter=ModelAdapter(model),
                           config_hash="")


def results(loaded_gpt2, loaded_induction):
    out = {}
    t = CausalTracing(loaded_gpt2).attribute("the cat sat on the mat", subject="cat", samples=3)
    out["trace.probs"] = t.probs
    a = Ablation(loaded_gpt2).attribute(["the cat sat on the mat", "a dog ran"], method="mean",
                                        layers="blocks.*.attn.heads.*, blocks.0.mlp, blocks.1.mlp[0,3]")
    out["ablate.mean"] = a.ablated
    r = Ablation(loaded_gpt2).attribute(["a b c d e", "a b the d e"], method="resample", target=(" c", " the"),
                                        layers="blocks.*.mlp")
    out["ablate.resample"] = r.ablated
    h = HeadStatistics(loaded_induction).attribute(seq_len=8, n_sequences=4, importance="zero")
    out["heads"] = np.concatenate([h.entropy, h.prev_token, h.induction, h.importance]).ravel()
    c = AttributionPatching(loaded_induction).attribute("a b c d e f g h a b c d", "a b c p e f g h a b c d",
                                                        target=("e", "p"))
    out["circuit.edges"] = np.nan_to_num(c.edge_scores)
    g = AttributionPatching(loaded_gpt2, batch_size=1).attribute(["a b c d e", "a b c d f"],
                                                                ["a b the d e", "a b the d f"], target=(10, 11))
    out["circuit.gpt2"] = np.nan_to_num(g.edge_scores)
    cf = Counterfactual(loaded_gpt2).attribute("a b c d e", "a b the d e")
    out["counterfactual"] = np.concatenate([cf.norms.ravel(), cf.kl])
    s = Steering(loaded_gpt2).generate("the cat", np.ones(64, dtype=np.float32), layers="blocks.1", alpha=0.0,
                                       max_new_tokens=5)
    out["steer.same"] = np.array([float(s.baseline_ids == s.steered_ids)])
    out["steer.promoted"] = np.array([v for _, v in s.promoted])
    return out


def main(device: str) -> int:
    root = Path(tempfile.mkdtemp())
    gpt2 = make_tiny("gpt2", root / "gpt2")
    induction = build_induction_model(root / "induction")
    started = time.time()
    cpu = results(load(gpt2, "cpu"), load(induction, "cpu"))
    middle = time.time()
    dev = results(load(gpt2, device), load(induction, device))
    print(f"device {torch.cuda.get_device_name(0) if device.startswith('cuda') else device}; cpu {middle - started:.1f}"
          f" s, {device} {time.time() - middle:.1f} s")
    bad = 0
    for key in cpu:
        diff = float(np.max(np.abs(cpu[key] - dev[key]))) if cpu[key].size else 0.0
        scale = float(np.max(np.abs(cpu[key]))) if cpu[key].size else 0.0
        ok = diff <= 1e-3 * max(scale, 1.0)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {key:18s} max |cpu - {device}| = {diff:.3g} (scale {scale:.3g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
