"""The FIRM reward server as a Ray Serve application: critic replicas behind a path-routing ingress."""
