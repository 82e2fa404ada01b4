"""The benchmarks (bench/README.md). Importing minibert first gives every bench the OpenMP wait default
the stages run with (minibert/__init__.py), before any bench module loads torch."""
import minibert  # noqa: F401
