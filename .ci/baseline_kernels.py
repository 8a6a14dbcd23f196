"""Baseline CPU kernels for `make test-portable`, and a check that they took effect.

`python .ci/baseline_kernels.py` prints the value for NPY_DISABLE_CPU_FEATURES: numpy's optional SIMD targets
(its dispatch list) that this CPU has. numpy refuses to disable its baseline and warns about names it does not
dispatch, so the list is read from the installed numpy, whatever its version and the machine's features.

`python .ci/baseline_kernels.py --check` prints the kernels in use (torch's ATen capability, numpy's SIMD
targets, the BLAS libraries' code paths) and exits 1 when ATEN_CPU_CAPABILITY=default or
NPY_DISABLE_CPU_FEATURES did not take effect.
"""

import os
import subprocess
import sys


def _umath():
    try:
        from numpy._core import _multiarray_umath  # numpy >= 2
    except ImportError:
        from numpy.core import _multiarray_umath
    return _multiarray_umath


def optional_numpy_features() -> list[str]:
    m = _umath()
    return [f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)]


def _mkl_code_path() -> str:
    """The instruction set MKL dispatched to, from its verbose banner (MKL has no query exposed to Python)."""
    code = "import torch; a = torch.ones(64, 64, dtype=torch.float64); a @ a"
    env = dict(os.environ, MKL_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    banner = next((line for line in out.splitlines() if "architecture" in line and "MKL" in line), "")
    return banner.split("architecture", 1)[1].split(",")[0].strip() if banner else "not MKL (or no banner)"


def check() -> int:
    import numpy as np
    import torch

    m = _umath()
    capability = torch.backends.cpu.get_cpu_capability()
    dispatched = [f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)]
    print(f"torch {torch.__version__}: ATen CPU capability {capability}")
    print(f"numpy {np.__version__}: baseline {m.__cpu_baseline__}, optional targets still enabled: {dispatched}")
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                print(f"{lib['internal_api']} ({os.path.basename(lib['filepath'])}): {lib.get('architecture')}")
    except ImportError:
        pass
    print(f"MKL (torch): {_mkl_code_path()}")
    failed = []
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default" and capability != "DEFAULT":
        failed.append(f"ATEN_CPU_CAPABILITY=default, but torch uses {capability}")
    if os.environ.get("NPY_DISABLE_CPU_FEATURES") and dispatched:
        failed.append(f"NPY_DISABLE_CPU_FEATURES is set, but numpy still dispatches to {dispatched}")
    for line in failed:
        print("error:", line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    print(" ".join(optional_numpy_features()))
