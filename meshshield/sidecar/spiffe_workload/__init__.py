"""The SPIFFE Workload API protocol modules, generated from workload.proto (`make proto`)."""
