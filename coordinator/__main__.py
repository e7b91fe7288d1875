"""`python -m coordinator`: the same as the `coordinator` script."""

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before main's guard: as quiet as within it
    raise SystemExit(130) from None

main()
