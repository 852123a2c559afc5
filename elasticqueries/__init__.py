"""Data only: the Elasticsearch/OpenSearch index templates, lifecycle policies and sample queries
(see README.md here). Shipped as trackalert.elasticqueries so that the daemon installs the
templates from the files an operator reads."""
