"""Training: the train step, checkpoints and evaluation."""

from rite_optax.train import checkpoints
from rite_optax.train import step
from rite_optax.train.checkpoints import CheckpointError
from rite_optax.train.checkpoints import CheckpointSaveError
from rite_optax.train.checkpoints import Checkpoints
from rite_optax.train.checkpoints import PreemptionGuard
from rite_optax.train.checkpoints import Restored
from rite_optax.train.checkpoints import train_loop
from rite_optax.train.step import NonFiniteSteps
from rite_optax.train.step import NonFiniteStepsError
from rite_optax.train.step import TrainSetup
from rite_optax.train.step import TrainShardings
from rite_optax.train.step import TrainState
from rite_optax.train.step import create_train_state
from rite_optax.train.step import initialize_distributed
from rite_optax.train.step import make_eval_step
from rite_optax.train.step import make_train_step
from rite_optax.train.step import opt_state_shardings
from rite_optax.train.step import shard_batch
from rite_optax.train.step import train_shardings
