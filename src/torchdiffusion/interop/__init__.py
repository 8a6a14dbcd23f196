"""Other libraries' formats and conventions, with none of them needed at run time.

``diffusers.py``: diffusers pipeline and ``UNet2DModel`` folders read as our U-Net, denoiser and process, and our
U-Nets written as such folders. ``k_diffusion.py``: k-diffusion's ``D(x, sigma)`` models as (denoiser, process)
and back, and its sampling module loaded alone for parity tests and benchmarks.
"""
