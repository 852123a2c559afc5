"""trackalert: long-term login abuse tracking and alerting, companion of PowerDNS wforce."""

__version__ = "0.1.0"
