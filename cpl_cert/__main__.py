"""``python -m cpl_cert`` runs the command line (also under torchrun)."""

from .cli import main

if __name__ == "__main__":
    main()
