"""Federated training on Flower: the engine that moves the one training pipeline's messages.

The pipeline and what a site computes live in :mod:`feda2v_toolkit.training` and never import Flower; here
``app`` is the Flower ServerApp/ClientApp pair (:class:`~feda2v_toolkit.federated.app.FlowerTransport`),
``engine`` runs it in this process, ``simulation`` on Flower's Simulation Engine, ``deploy`` submits it to a
SuperLink, ``run`` is :func:`~feda2v_toolkit.federated.run.federate` and ``node_dp`` node-level DP. Install with
``pip install "feda2v-tk[federated]"``.
"""

#: seconds ``federate --superlink`` keeps trying a SuperLink that does not answer yet (``--connect-wait``): one
#: started just before may not listen yet (SuperNodes retry alike)
CONNECT_WAIT = 60.0
