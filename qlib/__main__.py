"""`python -m qlib`: a Ctrl-C while the heavy imports load is one line too, not a bare KeyboardInterrupt."""
import sys

try:
    from qlib.cli import main
except KeyboardInterrupt:
    print("\nqlab: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
