public let placeholderConfig = 0
