"""Questions about a module's parameters that several parts of the model ask."""


def weights_key(module):
    """Identifies the current values of a module's parameters: an optimiser step, a loaded state
    dict or a move to another device or dtype changes it. Cheap: no tensor is read."""
    return tuple((param.data_ptr(), param._version) for param in module.parameters())


def is_trained(module):
    """Whether any parameter of the module receives gradients."""
    return any(param.requires_grad for param in module.parameters())
