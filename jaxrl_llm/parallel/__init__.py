"""Device meshes, logical-axis sharding rules and multi-process start-up, shared by every layer."""

from .distributed import barrier, initialize, is_main_process, to_host
from .mesh import (
    MESH_AXES,
    MeshError,
    data_split,
    make_mesh,
    mesh_from_config,
    padded_rows,
    parse_mesh,
    resolve_axis_sizes,
    role_meshes,
)
from .rules import (
    DEFAULT_RULES,
    constrain,
    fitting_axes,
    logical_to_spec,
    named_sharding,
    state_shardings,
    variable_axes,
)
from .shardings import (
    abstract,
    batch_axes,
    batch_shardings,
    frozen_copy,
    place,
    put,
    rows_shardings,
    tree_shardings,
)
