"""Running raysim elsewhere: Ray jobs on a cluster and KubeRay manifests."""
