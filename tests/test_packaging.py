"""The core imports with torch alone; optional pieces name the extra to install."""

from __future__ import annotations

import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'transformers', 'deepspeed', 'accelerate', 'matplotlib'}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_core_imports_and_runs_with_torch_only():
    proc = run("""
import torch, moe_balance as mb
bal = mb.Balancer(num_layers=1, num_experts=4, top_k=1, aux_loss='switch')
x = torch.randn(8, 4, requires_grad=True)
p = x.detach().softmax(-1)
bal.observe(0, x, p.topk(1).indices, selection_scores=p); bal.loss().backward(); bal.step()
print('ok', bal.metrics()['tokens'])
""")
    assert proc.returncode == 0, proc.stderr
    assert "ok 8.0" in proc.stdout


def test_optional_pieces_name_their_extra():
    proc = run("""
try:
    import moe_balance.integrations.hf
except ImportError as e:
    print('hint:', e)
try:
    import os, tempfile
    from moe_balance.plot import plot_maxvio
    plot_maxvio({'a': ([0], [1])}, os.path.join(tempfile.mkdtemp(), 'x.png'))
except ImportError as e:
    print('hint:', e)
""")
    assert "pip install 'moe-balance[hf]'" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install 'moe-balance[plot]'" in proc.stdout
