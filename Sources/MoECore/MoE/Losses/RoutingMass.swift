// The two losses that weigh the routing mass of each expert by its selection count share these.

/// sums[e] += Σ of the kept weights routed to expert e.
func addWeightSums<T: Scalar>(_ routing: Routing<T>, into sums: UnsafeMutablePointer<Double>) {
    for j in 0..<routing.count { sums[Int(routing.experts[j])] += Double(routing.weights[j]) }
}

/// dw_j += scale · perExpert[e_j] for every kept assignment j.
func addPerExpertGradient<T: Scalar>(_ routing: Routing<T>, scale: T, perExpert: [T], into dWeights: UnsafeMutablePointer<T>) {
    for j in 0..<routing.count { dWeights[j] += scale * perExpert[Int(routing.experts[j])] }
}
