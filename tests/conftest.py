"""Puts the repository root on sys.path, so the tests import model.py however pytest is started."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
