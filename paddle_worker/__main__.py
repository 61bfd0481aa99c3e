import sys

from protocol.adapter import main

if __name__ == "__main__":
    from .adapter import PaddleAdapter
    sys.exit(main(PaddleAdapter, "paddle"))
