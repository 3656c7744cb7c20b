"""What auditors read: the history of a record, verification of the store, the exports."""
