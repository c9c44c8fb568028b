"""Test-wide settings: offline hub, deterministic CPU math; tests import each other's references."""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
# Annotation indexes go to a throwaway folder, not the user's ~/.cache.
os.environ.setdefault("EVLGEN_CACHE", tempfile.mkdtemp(prefix="evlgen-test-cache-"))
