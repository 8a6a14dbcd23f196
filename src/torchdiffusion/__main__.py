"""``python -m torchdiffusion ...`` is the ``torchdiffusion`` command (also ``torchrun -m torchdiffusion train``)."""

from .app.cli import main

if __name__ == "__main__":
    main(prog_name="torchdiffusion")
