"""Exports written before storage records (format v2, tests/golden/export_v2 from
make_export_v2.py) are refused with the command that converts them, and convert to exports
that load to the values v2's reader gave (recorded beside them by the old code)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmjax.cli import convert_export
from mmjax.compress import export
from mmjax.compress.core import flatten

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def test_a_v2_export_is_refused_with_the_command_and_converts_to_the_same_values(tmp_path):
  old = str(tmp_path / "old")
  shutil.copytree(os.path.join(GOLDEN, "export_v2"), old)
  with pytest.raises(ValueError, match=r"python -m mmjax.cli.convert_export --src="):
    export.load(old)
  want = np.load(os.path.join(GOLDEN, "export_v2_expected.npz"))
  new = str(tmp_path / "new")
  convert_export.convert(old, new)
  got = flatten(export.load(new))
  views = {k.split(":", 1)[1]: want[k] for k in want.files if k.startswith("view:")}
  assert sorted(got) == sorted(views)
  for path, w in views.items():  # QAT int4/int8/int3 (packed), masked int8, a grid, fp32
    np.testing.assert_array_equal(np.asarray(got[path]), w, err_msg=path)
  scales, bits, mode = export.load_activation_scales(new)
  assert (bits, mode) == (8, "fake")
  assert scales == {k.split(":", 1)[1]: want[k] for k in want.files if k.startswith("act:")}
  # the same codes, now all on grids: no more bytes than before (a few index bytes aside)
  assert export.disk_bytes(new) <= export.disk_bytes(old) + 512
  assert set(export.load_grid_codes(new)) == {"qat4/kernel", "qat8/kernel", "conv/kernel",
                                             "pruned/kernel", "grid/kernel"}

  # the command the error gives converts in place; a v3 export is not converted again
  run = lambda: subprocess.run([sys.executable, "-m", "mmjax.cli.convert_export",
                                f"--src={old}"], capture_output=True, text=True, timeout=120)
  out = run()
  assert out.returncode == 0, out.stderr
  np.testing.assert_array_equal(flatten(export.load(old))["qat4/kernel"], views["qat4/kernel"])
  out = run()
  assert out.returncode == 1 and "needs no conversion" in out.stderr
