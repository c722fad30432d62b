"""python -m pipenag train --config configs/tiny.toml"""

from pipenag.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
