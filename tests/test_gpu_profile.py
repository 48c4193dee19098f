"""A CPU rehearsal of the `gpu` profile: notebooks 01, 04, 05 and 07 run headless with papermill exactly as on
a GPU (profile `gpu`, random-init architectures), shrunk only by their parameters, so a GPU session spends its
time measuring, not debugging notebook glue. Checks the schema, the random-init provenance, null quality and
the exact parameter counts of the architectures."""
import json
from pathlib import Path

import pytest

from qlib import results
from qlib.studies import llama_scaling

# 07's roofline at the smoke profile's size: its default ladder (60M-1B) is minutes of CPU
SMOKE_ROOFLINE = {k: list(v) if isinstance(v, tuple) else v for k, v in llama_scaling.PROFILES["smoke"].items()
                  if k.startswith("roofline_")}  # papermill passes lists, not tuples

pytestmark = pytest.mark.slow  # notebooks in the gpu profile: `make test-fast` leaves this file out

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"

# (notebook, papermill parameters that shrink it, {method: (trainable, total)} expected in its rows)
REHEARSALS = [
    ("01_baseline", dict(n_train=16, max_length=16, batch_size=8),
     {"fp32": (109_483_778, 109_483_778)}),  # the true bert-base + a 2-way head
    ("04_qlora_bert", dict(random_arch="tiny", batch_size=4, seq_len=16),
     {"fp32": (2_057_666, 2_057_666), "qlora": (32_962, 2_090_628)}),
    ("05_gpt2_bitnet", dict(model_id="gpt2-stdlib-tiny", batch_size=2, context=32, stride=32, steps=3),
     {"fp32": (1_743_872, 1_743_872), "qlora": (131_072, 1_874_944), "bitnet": (1_743_872, 1_743_872),
      "int8": (0, 1_743_872)}),
    ("07_llama_scaling", dict(rungs="llama-2m,llama-5m", seq=32, steps=1, t4_check=False, **SMOKE_ROOFLINE),
     {"lora": (39_424, 4_196_672), "qlora": (39_424, 4_196_672)}),  # llama-2m, 32k vocab; first row per method
]


@pytest.mark.parametrize("stem, params, counts", REHEARSALS, ids=[r[0] for r in REHEARSALS])
def test_gpu_profile_notebook_runs_headless(stem, params, counts, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))  # results/gpu/ and outputs/gpu/ of this rehearsal only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    pm.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(tmp_path / f"{stem}.ipynb"), cwd=str(NOTEBOOKS),
                        parameters={"profile": "gpu", "device": "cpu", **params}, kernel_name="python3",
                        progress_bar=False)
    doc = json.loads((tmp_path / "results" / "gpu" / stem / "metrics.json").read_text())
    results.validate_metrics(doc, stem)
    assert doc["profile"] == "gpu" and doc["assets"]["model"]["source"] == "random-init"
    assert doc["assets"]["data"]["id"] == "random tokens"  # nothing but the code has to reach the GPU machine
    assert all(r.get("accuracy") is None and r.get("perplexity") is None for r in doc["rows"])
    first = {}
    for r in doc["rows"]:
        first.setdefault(r["method"], (r["trainable_params"], r["total_params"]))
    assert {m: first[m] for m in counts} == counts
    if stem == "07_llama_scaling":  # where the time goes: the roofline's parts add up to no more than its whole
        parts = doc["roofline"]["section_seconds"]
        assert {"ceilings", "GGUF files", "llama.cpp tiny", "transformers tiny"} <= set(parts)
        assert 0 < sum(parts.values()) <= doc["section_seconds"]["roofline"] + 0.1 * len(parts)
    assert list((tmp_path / "results" / "gpu" / stem / "figures").glob("*.png"))
