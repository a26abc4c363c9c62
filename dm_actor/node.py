"""Cluster mode's composition (issue 17): a dm-actor node among others on one PostgreSQL
database. Filled in by the cluster work of this session."""
