"""feda2v-tk-flow: an example feda2v-tk plugin.

* generator type ``realnvp`` -- a RealNVP normalizing flow trained by exact maximum likelihood
  (:mod:`feda2v_tk_flow.flow`);
* reducer and upsampler ``dct`` -- low-pass resampling along the sequence (:mod:`feda2v_tk_flow.spectral`);
* config keys ``flow_*`` with a schema fragment, and the ``flow`` migration chain
  (:mod:`feda2v_tk_flow.migrations`);
* command ``feda2v-tk flow-nll`` -- exact held-out likelihood of real data under a trained model.

The hooks live in :mod:`feda2v_tk_flow.plugin`, the module the entry point names. Importing this
package does not import torch.
"""

__version__ = "0.2.0"
