"""FHE glue: deployment checks, key cache, evaluators (server side) and client crypto."""
