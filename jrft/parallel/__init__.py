"""jrft.parallel: meshes over (data, fsdp, tensor) and the logical-axis sharding rules.

(``jrft.parallel.distributed`` — multi-host initialisation and the host gathers across processes — lives
beside these.)
"""

from jrft.parallel.distributed import MainProcessFilter as MainProcessFilter
from jrft.parallel.distributed import gather_lists as gather_lists
from jrft.parallel.distributed import gather_rows as gather_rows
from jrft.parallel.distributed import host_array as host_array
from jrft.parallel.distributed import host_local_rows as host_local_rows
from jrft.parallel.distributed import initialize_distributed as initialize_distributed
from jrft.parallel.distributed import is_main_process as is_main_process
from jrft.parallel.distributed import local_rows as local_rows
from jrft.parallel.distributed import log_on_main as log_on_main
from jrft.parallel.mesh import MESH_AXES as MESH_AXES
from jrft.parallel.mesh import make_mesh as make_mesh
from jrft.parallel.sharding import LOGICAL_RULES as LOGICAL_RULES
from jrft.parallel.sharding import logical_axes_of as logical_axes_of
from jrft.parallel.sharding import logical_to_spec as logical_to_spec
from jrft.parallel.sharding import shard_model as shard_model
from jrft.parallel.sharding import state_shardings as state_shardings
from jrft.parallel.sharding import with_logical_constraint as with_logical_constraint
