"""jaxbp: hand-derived backpropagation in JAX, checked against autodiff."""

from jaxbp.autodiff import autodiff_grads
from jaxbp.autodiff import autodiff_value_and_grads
from jaxbp.backward import ChainTerms
from jaxbp.backward import chain_terms
from jaxbp.backward import manual_grads
from jaxbp.backward import manual_value_and_grads
from jaxbp.backward import per_example_manual_grads
from jaxbp.batched import Formulation
from jaxbp.batched import choose_formulation
from jaxbp.model import forward
from jaxbp.model import loss
from jaxbp.parallel import data_parallel_mean
from jaxbp.params import Params
from jaxbp.params import init_params
from jaxbp.spec import ConvNetSpec
from jaxbp.train import make_update_step
from jaxbp.train import sgd

__version__ = "0.1.0"
