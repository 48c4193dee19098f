"""llama.cpp types quantized with an importance matrix that qlib computes on calibration text (`quant.imatrix`):
the way GGUF files are published. Each k-/legacy type sits beside its round-to-nearest twin (`control`); the
IQ1-IQ3 types exist only with a matrix."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qlib import models
from qlib.backends import gguf
from qlib.core.errors import QlabError
from qlib.methods.gguf import f16_file, ship
from qlib.methods.registry import Job, Method, register
from qlib.quant import imatrix

# Q8_0, F16 and the ternary types ignore an importance matrix; every other llama.cpp type weights its rounding by it
WITH_CONTROL = tuple(t for t in gguf.QUANT_TYPES if t not in ("q8_0", "q2_0", "tq1_0", "tq2_0"))


def importance_matrix(job: Job) -> tuple[Path, float]:
    """This run's importance matrix file (computed once on the calibration windows, shared by every type) and the
    seconds it took."""
    if "imatrix" not in job.shared:
        if job.calibration is None or not job.calibration.windows:
            raise QlabError("needs calibration text for its importance matrix; none was given")
        t0 = time.perf_counter()
        model = models.load_causal_lm(job.src, None, job.device).eval()
        stats = imatrix.collect(model, job.calibration.windows, job.device)
        del model
        path = gguf.write_imatrix(stats, f16_file(job), job.out / "imatrix.gguf", [job.calibration.source],
                                  job.calibration.record()["length"])
        job.shared["imatrix"] = (path, time.perf_counter() - t0)
    return job.shared["imatrix"]


def _imat(qtype: str) -> Callable[[Job], Path]:
    def write(job: Job) -> Path:
        path, seconds = importance_matrix(job)
        return ship(job, f"{qtype}-imat", lambda dst: gguf.quantize(f16_file(job), dst, qtype, imatrix=path),
                    calibration={**job.calibration.record(), "imatrix_file": path.name,
                                 "imatrix_seconds": round(seconds, 2)})
    return write


for _t in WITH_CONTROL + gguf.IMATRIX_TYPES:
    register(Method(f"gguf_{_t}_imat", "llama.cpp", _imat(_t), needs=("gguf_f16",),
                    control=f"gguf_{_t}" if _t in WITH_CONTROL else None, calibration=True,
                    about=f"llama.cpp {_t.upper()} with qlib's importance matrix"))
