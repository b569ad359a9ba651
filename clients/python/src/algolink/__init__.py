"""Python client for the AlgoLink model server.

>>> from algolink import Client
>>> c = Client("http://localhost:8000", token="alk_...")
>>> c.push("model.onnx", "team/fraud")
>>> p = c.predict("team/fraud", X)        # {"output_name": np.ndarray, ...}, with p.id and p.version
>>> c.feedback(p, 1.0)
"""

from .client import AlgoLinkError, Client, Prediction, to_onnx

__all__ = ["AlgoLinkError", "Client", "Prediction", "to_onnx"]
__version__ = "0.1.0"
