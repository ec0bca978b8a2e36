"""Data plane: framed TCP messages between peers, with a fault-injection seam."""
