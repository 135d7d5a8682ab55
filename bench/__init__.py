"""podiam's benchmarks: ``python -m bench`` (see ``bench/__main__.py``) and the locust file."""
