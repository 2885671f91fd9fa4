"""Run by tests/test_accuracy_budget.py in a fresh process: compile a two-site model under an
accuracy budget (real timings), call it twice, print what was measured and chosen as JSON."""

import json
import sys
import warnings

import torch

import fv_compile

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repository root: tests/ imports below
from tests.test_accuracy_budget import TwoSites, two_site_inputs

cm = fv_compile.compile(TwoSites(), compiler="eager", accuracy_budget=0.05)
with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _ in range(2):
        cm(*two_site_inputs())
sites = cm.explain().sites
print(
    json.dumps(
        {
            "measured": cm._fv_backend.tuner.measured,
            "choices": [s.backend for s in sites],
            "sources": [s.tuning.source for s in sites],
        }
    )
)
