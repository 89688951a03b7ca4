"""A mesh that does not fit the devices fails with one error naming the axes and sizes
(research.core.mesh.axis_sizes; a pure function of the config and the device count)."""
import pytest

from research.core.config import ConfigError
from research.core.mesh import axis_sizes


def test_mesh_that_does_not_use_all_devices_names_sizes():
    with pytest.raises(ConfigError, match=r"uses 3 devices but 8 are present") as e:
        axis_sizes({"data": 3}, 8)
    assert "'data': 3" in str(e.value)


def test_fill_axis_that_cannot_divide_names_the_product():
    with pytest.raises(ConfigError, match=r"8 devices do not divide by the fixed axis sizes "
                                          r"\(product 3\)"):
        axis_sizes({"data": -1, "tensor": 3}, 8)


def test_valid_meshes():
    assert axis_sizes({"data": -1, "pipeline": 2, "expert": 2}, 8) == (2, 1, 1, 2, 2)
    assert axis_sizes({"fsdp": 4, "tensor": 2}, 8) == (1, 4, 2, 1, 1)
