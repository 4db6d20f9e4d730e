"""Placement under a budget: the card's gains and costs of layer sets, and the coupling-aware solver."""
