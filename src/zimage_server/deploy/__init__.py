"""Scale-out on Ray Serve: the same engine and API, deployed as Serve deployments.

    options.py     RayOptions: replicas, autoscaling and GPUs per replica (no Ray import)
    replica.py     EngineReplica: one ``Engine`` (its batcher and one worker process) per GPU
    ray_engine.py  RayEngine: the ``EngineLike`` the API uses, forwarding to the replicas
    ingress.py     ApiIngress: the full FastAPI app as the Serve ingress
    ray_app.py     build_app(args) for ``serve run`` and Serve config files
    cli.py         serve_ray(...) behind ``zimage serve --ray``

Only ``options`` is imported here: Ray is an optional dependency (``pip install
"zimage-server[ray]"``) and the single-machine server never imports it.
"""

from zimage_server.deploy.options import RayOptions

__all__ = ["RayOptions"]
