"""Case folders: found inside dataset folders, read with their optional truth, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.case_folder import case_folders_in, expand_case_folders, is_case_folder, read_case
from IPv2DenoiseLib.io.volumes import write_volume


def _case(folder, *, keys=("uldct", "ndct"), suffix=".nrrd"):
    folder.mkdir(parents=True)
    for i, key in enumerate(keys):
        write_volume(
            Volume(np.full((2, 4, 5), -1000.0 + 10.0 * i, np.float32), (0.7, 0.7, 2.0)),
            folder / f"{key}{suffix}",
        )
    return folder


def test_expand_and_read(tmp_path):
    a = _case(tmp_path / "data" / "case_001", keys=("uldct", "ndct", "uldct_clean"))
    b = _case(tmp_path / "data" / "case_000", suffix=".nii.gz")
    (tmp_path / "data" / "notes").mkdir()
    assert is_case_folder(a) and not is_case_folder(tmp_path / "data")
    assert case_folders_in(tmp_path / "data") == [b, a]
    assert expand_case_folders([tmp_path / "data", a]) == [str(b), str(a), str(a)]
    vols = read_case(a)
    assert sorted(vols) == ["ndct", "uldct", "uldct_clean"]
    assert vols["ndct"].array.mean() == pytest.approx(-990.0)
    assert sorted(read_case(b)) == ["ndct", "uldct"]


def test_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="training data folder not found"):
        expand_case_folders([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no case folders with uldct.nrrd/ndct.nrrd inside"):
        expand_case_folders([tmp_path / "empty"])
    only_u = _case(tmp_path / "only_u", keys=("uldct",))
    with pytest.raises(UserError, match="training case lacks ndct"):
        read_case(only_u)
