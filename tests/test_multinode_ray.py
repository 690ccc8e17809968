"""Workers on a node without the decoded-image cache file read the driver's shared copy.

The search over two Ray nodes (a second node joins the session's cluster; the real CLI
with `--address`; every fit spans both nodes) is in `test_faults_ray.py`, where the same
search also survives the injected faults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distmed.worker import load_images

pytestmark = pytest.mark.ray


def test_workers_without_the_cache_file_read_the_shared_copy(ray_session, tmp_path: Path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    ref = ray_session.put(images)
    np.testing.assert_array_equal(load_images(str(tmp_path / "not-on-this-node.npy"), ref), images)
    with pytest.raises(FileNotFoundError, match="not on this node"):
        load_images(str(tmp_path / "not-on-this-node.npy"), None)
    np.save(tmp_path / "here.npy", images + 1)  # the local file wins over the shared copy
    np.testing.assert_array_equal(load_images(str(tmp_path / "here.npy"), ref), images + 1)
