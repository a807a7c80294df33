"""beamvision.serving: a model artifact behind HTTP (``beamvision serve``).

- ``batcher``: concurrent requests' images gathered into the engine's batch;
- ``service``: what a request asks of the model: decoding, limits, reading
  URIs, answers and their errors (plain functions and one ``Service`` object);
- ``app``: the ASGI application (Starlette): routes, the token, body limits,
  a log line per request;
- ``label_studio``: Label Studio's ML-backend protocol on the same service.
"""
