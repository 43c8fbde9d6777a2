@testable import MoECore
import MoEIO

/// Standalone gates for tests, composed from a router weight as the registry composes them.
enum TestGates {
    static func topK(router: Parameter<Double, Replicated>, k: Int, renormalization: Renormalization, capacityFactor: Double?,
                     evalCapacityFactor: Double?, minimumCapacity: Int, balanceCoefficient: Double, zLossCoefficient: Double,
                     secondChoice: SecondChoicePolicy? = nil) -> (gate: Gate<Double>, policy: TopKPolicy<Double>) {
        let experts = router.columns
        let policy = TopKPolicy<Double>(expertCount: experts, k: k, renormalization: renormalization, capacityFactor: capacityFactor,
                                        evalCapacityFactor: evalCapacityFactor, minimumCapacity: minimumCapacity, secondChoice: secondChoice)
        var losses: [any AuxiliaryLoss<Double>] = [LoadBalanceLoss<Double>(coefficient: balanceCoefficient, experts: experts, k: k,
                                                                          firstChoicesOnly: secondChoice != nil)]
        if zLossCoefficient > 0 { losses.append(RouterZLoss<Double>(coefficient: zLossCoefficient)) }
        return (Gate(kind: .topk, expertCount: experts, router: LinearRouter(weight: router), policy: policy, losses: losses), policy)
    }

    static func denseToSparse(router: Parameter<Double, Replicated>, bias: Parameter<Double, Replicated>?,
                              transform: ThresholdPolicy<Double>.Transform, schedule: TemperatureSchedule, threshold: Double,
                              auxiliaryCoefficient: Double) -> Gate<Double> {
        let experts = router.columns
        return Gate(kind: bias == nil ? .dts : .activationDTS, expertCount: experts, router: LinearRouter(weight: router, bias: bias),
                    policy: ThresholdPolicy(expertCount: experts, transform: transform, schedule: schedule, threshold: threshold),
                    losses: [SelectionBalanceLoss<Double>(coefficient: auxiliaryCoefficient, experts: experts)])
    }

    static func base(centroids: Parameter<Double, Replicated>, epsilon: Double) -> Gate<Double> {
        Gate(kind: .base, expertCount: centroids.columns,
             router: LinearRouter(weight: centroids, orthogonal: (gain: 0.1, key: { RandomKey(UInt64($0)).derive("centroids").derive($1) })),
             policy: BalancedAssignmentPolicy(expertCount: centroids.columns, epsilon: epsilon))
    }

    static func hash(table: Parameter<Double, Replicated>, expertCount: Int, balancedBy frequencies: [Int]?) -> Gate<Double> {
        Gate(kind: .hash, expertCount: expertCount, router: nil,
             policy: TableLookupPolicy(table: table, expertCount: expertCount, balancedBy: frequencies))
    }

    static func expertChoice(router: Parameter<Double, Replicated>, capacityFactor: Double) -> Gate<Double> {
        Gate(kind: .expertChoice, expertCount: router.columns, router: LinearRouter(weight: router),
             policy: ExpertChoicePolicy(expertCount: router.columns, capacityFactor: capacityFactor))
    }
}
