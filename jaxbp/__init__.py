"""jaxbp: hand-derived backpropagation in JAX, checked against autodiff."""

from jaxbp.autodiff import autodiff_grads
from jaxbp.autodiff import autodiff_value_and_grads
from jaxbp.autodiff import network_autodiff_grads
from jaxbp.autodiff import network_autodiff_value_and_grads
from jaxbp.backward import ChainTerms
from jaxbp.backward import chain_terms
from jaxbp.backward import manual_grads
from jaxbp.backward import manual_value_and_grads
from jaxbp.backward import per_example_manual_grads
from jaxbp.checkpoint import load_checkpoint
from jaxbp.checkpoint import save_checkpoint
from jaxbp.data import load_digits
from jaxbp.data import load_idx
from jaxbp.data import make_task
from jaxbp.data import read_idx
from jaxbp.layers import AvgPool
from jaxbp.layers import Conv2D
from jaxbp.layers import Conv2DParams
from jaxbp.layers import Dense
from jaxbp.layers import DenseParams
from jaxbp.layers import Flatten
from jaxbp.layers import HalfSquaredError
from jaxbp.layers import Layer
from jaxbp.layers import Loss
from jaxbp.layers import MaxPool
from jaxbp.layers import Relu
from jaxbp.layers import Sigmoid
from jaxbp.layers import SigmoidBinaryCrossEntropy
from jaxbp.layers import SoftmaxCrossEntropy
from jaxbp.layers import Tanh
from jaxbp.model import forward
from jaxbp.model import loss
from jaxbp.network import LayerTerms
from jaxbp.network import Network
from jaxbp.network import lenet5
from jaxbp.network import params_from_network
from jaxbp.network import params_to_network
from jaxbp.network import slides_network
from jaxbp.params import Params
from jaxbp.params import init_params
from jaxbp.spec import ConvNetSpec
from jaxbp.train import make_update_step
from jaxbp.train import sgd

__version__ = "0.1.0"
