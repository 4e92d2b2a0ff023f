"""Federated training: the engine-agnostic server loop and node handler, and their Flower adaptation.

``site`` (what a node computes) and ``server`` (what the server merges) never import Flower; ``app`` is the
Flower ServerApp/ClientApp pair and ``engine`` runs it on one machine. Install with
``pip install "feda2v-tk[federated]"``.
"""
