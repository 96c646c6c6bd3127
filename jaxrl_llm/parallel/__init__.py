"""Device meshes and the logical-axis sharding rules shared by models, training and rollout."""

from .mesh import MESH_AXES, MeshError, make_mesh, mesh_from_config, resolve_axis_sizes
from .rules import (
    DEFAULT_RULES,
    constrain,
    logical_to_spec,
    named_sharding,
    state_shardings,
    variable_axes,
)
