"""softprompt: prompt tuning of causal LMs."""
